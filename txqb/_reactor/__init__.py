"""The only code that touches the reactor: descriptors and transports."""
