"""Benchmarks of fastalign's ops against eager PyTorch, ``torch.compile`` and other libraries.

* ``harness``: what every benchmark shares (the ``Benchmark`` an op declares, the correctness
  check, timing, peak memory, FLOP credit, the run, CSV / PNG / markdown, hardware and versions);
* ``heads``: what the ops on an LM head share (shapes N,H,V, random heads, eager logits);
* one module per op: ``linear_logprobs``, ``linear_kl``, ``dpo``;
* ``registry``: ``BENCHMARKS``, the table ``fastalign bench`` and ``benchmarks/`` read;
* ``memory``: peak memory of a call on CUDA and CPU (also used by the tests);
* ``dpo_memory``: the fused-vs-eager DPO loss memory report that ``fastalign train dpo`` prints.

This package imports nothing on import, so that ``memory`` and ``dpo_memory`` stay cheap.
"""
