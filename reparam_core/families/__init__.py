"""Block families as data: each file holds a family's constructor data (specs), the function
that describes a spec as a block or model (reparam_core.nodes), and its registry entries."""
