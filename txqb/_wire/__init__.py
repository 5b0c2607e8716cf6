"""
txqb's sans-IO core: libqb's formats and rules as pure functions and
classes over bytes.  Nothing here performs a system call or imports Twisted.
"""
