"""Discrete-event simulation of a plan under a request stream (`podplan simulate`).

workload: arrivals and lengths (generators and the JSONL trace format); fleet: a plan's instances as
cost-model deployments with cached step times; engine: the event loop (aggregated: the loop of
mixed decode + prefill-chunk steps); report: percentiles, goodput,
sweeps; page: the HTML view; choose: goodput-driven choices for `compile --rate` and `diff --rate`.
"""
