"""The LLMTrainingJob API: spec/status models (pydantic) and torch-free contracts.

Submodules, by what they need at import time:

* standard library only — ``config`` (runtime dataclasses), ``shards`` (shard header and
  manifest), ``loader`` (loader protocol), ``progress`` (ProgressEvent), ``s3`` (S3 settings
  from spec.storage or the environment). The runtime core
  imports these where pydantic is absent, so this package's ``__init__`` imports nothing.
* pydantic — ``spec``, ``status``, ``job``; ``crd`` and ``validate`` build on them.
"""
