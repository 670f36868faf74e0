"""Templates (brand presets): a versioned catalogue of prompt patterns with typed slots.

`model.py` is what a template file may say, `catalogue.py` loads a directory of them as
one all-or-nothing unit, `render.py` turns a request that names a template into the
request that runs (plain substitution, never code), and `holder.py` keeps the last good
catalogue while reloading on SIGHUP or a file change.
"""
