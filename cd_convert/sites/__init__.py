"""The kinds of dropout site, one file each; :mod:`cd_convert.sites.registry` lists them in dispatch order.

See :mod:`cd_convert.sites.base` for the protocol a kind implements.
"""

__all__ = ["registry"]
