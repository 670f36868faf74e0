"""The stages a delivery passes through, each a small unit with one job.

In order: decode (`decoding.py`), identify (`identify.py`: the directory, the role
limits, the plugins' admission checks), admit (the driver's ledger transaction),
generate and encode (`generate.py`, on the GPU thread and the I/O pool), post-process
(`postprocess.py`, the post-processor plugins off the GPU thread), store (`store.py`),
commit (the driver's ledger transaction), publish (the worker, after the broker confirms).
A message that is no request of the ledger leaves by `refuse.py`.

The driver, `service.RequestService`, owns the ordering, the error dispositions
(`outcomes.py`) and the ledger transactions; a request's whole path reads top to bottom
there. Stages touch no ledger transaction and decide no outcome: they do their step or
raise the ZImageError that says why they could not.
"""
