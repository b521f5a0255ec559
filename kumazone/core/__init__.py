"""The domain core: names, VIPs, resources, config, inventories and tables, sync messages.

Pure: nothing here imports Twisted or anything outside this package, and time is
always passed in (C{now}).  Twisted protocols and services adapt it.
"""
