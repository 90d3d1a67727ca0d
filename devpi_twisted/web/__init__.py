"""The HTTP side: routes, views, responses and the one error-to-HTTP mapping."""
