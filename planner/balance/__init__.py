"""Expert replication and placement: EPLB (the baseline), the ILP balancer, migration-aware repair,
and the expert-load inputs they read."""
