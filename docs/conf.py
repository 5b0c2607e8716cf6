"""Sphinx configuration for txqb's documentation."""

import inspect
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, DOCS)
sys.path.insert(0, os.path.dirname(DOCS))

from _epytext import epytextToRest, processDocstring  # noqa: E402

from txqb._version import __version__  # noqa: E402

project = "txqb"
author = "the txqb authors"
copyright = "the txqb authors"
version = release = __version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]

exclude_patterns = ["_build"]
nitpicky = False
default_role = "py:obj"
html_theme = "alabaster"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Show these annotation names as written, not as the objects' reprs
# (zope interfaces).
autodoc_type_aliases = {
    "IReactorFDSet": "twisted.internet.interfaces.IReactorFDSet",
    "IReactorTime": "twisted.internet.interfaces.IReactorTime",
    "IServiceHandlers": "txqb.interfaces.IServiceHandlers",
}

# Classes users get from txqb rather than make: their constructors are
# internal, so their documentation shows no signature.
MADE_BY_TXQB = {
    "txqb.client.Client",
    "txqb.client.EventStream",
    "txqb.server.Service",
    "txqb.server.ServerConnection",
    "txqb.interfaces.IServiceHandlers",
}


def hideSignature(app, what, name, obj, options, signature, returnAnnotation):
    if what == "class" and name in MADE_BY_TXQB:
        return "", None
    return None


def interfaceMethods(app, what, name, obj, options, lines):
    """Document a zope interface's methods, which autodoc cannot see."""
    from zope.interface.interface import InterfaceClass

    if not isinstance(obj, InterfaceClass):
        return
    for methodName in obj.names():
        method = obj[methodName]
        doc = method.__doc__ or ""
        body = epytextToRest(inspect.cleandoc(doc).split("\n"))
        lines.append("")
        lines.append(f".. py:method:: {methodName}{method.getSignatureString()}")
        lines.append("")
        lines.extend(f"   {line}" if line else "" for line in body)


def setup(app):
    app.connect("autodoc-process-docstring", processDocstring)
    app.connect("autodoc-process-docstring", interfaceMethods)
    app.connect("autodoc-process-signature", hideSignature)
