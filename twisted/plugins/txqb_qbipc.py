"""twistd plugin dropin: ``twistd qbipc`` runs libqb-compatible services."""

from twisted.application.service import ServiceMaker

txqbQbipc = ServiceMaker(
    "txqb qbipc",
    "txqb._tap",
    "Run libqb-compatible IPC services (txqb).",
    "qbipc",
)
