"""
The web interface: HTML pages for people at devpi's own URLs, chosen by
content negotiation (L{devpi_twisted.model.negotiation.prefersHTML}), built
with C{twisted.web.template} over the same read services as the JSON API.
"""
