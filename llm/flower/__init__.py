"""Flower apps running the lowrank-fed methods: the runner's rounds on Flower's Message API (docs/flower.md).

Submodules (each needs ``flwr``, the ``flower`` extra; importing this package does not):
:mod:`.records` (a message as Flower records, bfloat16 sent as float32), :mod:`.strategy` (``LowRankStrategy``:
per-node downloads, the runner's reply checks, the method's server rule), :mod:`.client_app` (the ``ClientApp``:
``run_client`` with the node's persistent ``context.state``), :mod:`.server_app` (the ``ServerApp`` of
``flwr run .``), :mod:`.engine` (``FlowerSimulation``: ``lowrank-fed run --engine flower``; settings and
environment) and :mod:`.deploy` (``lowrank-fed flower up``: a SuperLink and SuperNodes as local processes), :mod:`.processes`
(every process of a run found by a marker and stopped however the command ends; standard library only).
"""
