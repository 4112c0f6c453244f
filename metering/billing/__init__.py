"""Billing: pure pricing arithmetic (money, price book, quotes) and Policy A.

Modules in this package do no I/O and import neither SQLAlchemy nor ``metering.config``.
"""
