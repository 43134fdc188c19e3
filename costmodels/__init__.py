"""Hardware facts, topologies and cost models: the leaf of podplan (numpy and networkx only)."""
