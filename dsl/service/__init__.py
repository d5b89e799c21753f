"""Service adapters: the only place that imports Ray, MLflow, boto3 and Optuna.

- ``storage_s3``: ``s3://`` checkpoint storage (registered with ``dsl.storage.open_storage``).
- ``tracking``: the MLflow store and training runs (one per run name); ``job_runs``: one run per job
  invocation (sample, evaluate, ...); ``code_version``: the code a run ran.
- ``ray_train``: Ray Train fine-tuning (``jobs/finetune.py``).
- ``local_cluster``: a loopback multi-node Ray cluster for development and tests.
- ``mauve_pool``, ``search``: MAUVE workers and the η_cap(T) search.

Nothing is imported here eagerly: ``import dsl.service.<module>`` pulls in only what it needs.
"""
