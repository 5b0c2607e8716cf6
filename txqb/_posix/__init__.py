"""System calls and FFI: sockets, credentials, shared files. No Twisted."""
