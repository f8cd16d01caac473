"""Helpers of the tests and benchmarks, apart from the runtime code: private
``redis-server`` processes (``redis_server``) and a reproducible multi-document QA set
with its scores (``rag_data``)."""
