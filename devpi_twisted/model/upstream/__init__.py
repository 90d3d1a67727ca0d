"""
Reading what an upstream index serves; pure code, no I/O.

L{project} reads a project page (L{jsonpage} for PEP 691, L{htmlpage} for
PEP 503), L{projectlist} the list of all projects; L{common} holds the
types and value checks they share.
"""
