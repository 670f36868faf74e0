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
    11 a burst of 50 for one principal, two workers test_broker_side.py
    12 a duplicate arriving while its twin runs     test_broker_side.py
    13 a retry three times over three delay queues  test_broker_side.py
    14 refusals never speak for another request     test_tenants.py
    15 a cancel cannot squat an id; cancels answered
                                                   test_tenants.py
    16 deeply nested JSON cannot wedge a queue      test_tenants.py
    17 a request cannot squat an id (scoped keys)   test_tenants.py
    18 a soak: two workers, six publishers, bursts, duplicates, cancels, junk
                                                   test_soak.py
       (and a GPU that hangs: test_gpu_hang.py)

After each case the checker also looks at the wire: one result per request message,
every delay-queue copy back once and on time, nothing left in the case's queues.

Workers that are killed or signalled are real processes (fault_worker.py: the production
worker with faults wrapped around its ports, in the test process only); the others run
in-process with the real adapters. Each case has private queue names, its own ledger
database and its own object prefix. Run: `.venv/bin/pytest tests/integration/fault_matrix`
with the local stack's environment (`.local/zimage.env`).
"""
