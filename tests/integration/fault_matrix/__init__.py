"""The fault matrix of issue #8: the whole pipeline on the real services (RabbitMQ,
PostgreSQL, slapd, SeaweedFS, the tiny model) under each fault, every case followed by
the invariant checker (invariants.py, checker.py; tests/unit/test_fault_invariants.py
proves it fails on broken books).

    1  kill -9 mid-generation                      test_kill.py
    2  kill -9 after upload / after commit / after the confirmed publish
                                                   test_kill.py
    3  RabbitMQ restart mid-stream (shared broker, under the services lock)
                                                   test_broker_restart.py
    4  PostgreSQL restart mid-stream (private cluster)
                                                   test_ledger_restart.py
    5  slapd stopped (private instance)            test_directory_down.py
    6  S3 stopped (private S3 server)              test_storage_down.py
    7  SIGTERM during a batch                      test_sigterm.py
    8  poison input, fuzzed                        test_poison.py
    9  one request_id twice, two workers at once   test_concurrency.py
    10 quota race across two workers               test_concurrency.py

Workers that are killed or signalled are real processes (fault_worker.py: the production
worker with faults wrapped around its ports, in the test process only); the others run
in-process with the real adapters. Each case has private queue names, its own ledger
database and its own object prefix. Run: `.venv/bin/pytest tests/integration/fault_matrix`
with the local stack's environment (`.local/zimage.env`).
"""
