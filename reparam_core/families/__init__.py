"""Block families as data: each family file holds the family's constructor data (specs), the
function that describes a spec as a block or model (reparam_core.blocks.nodes), its registry
entries and official constructors and, where other libraries implement the family, its key maps.
`specs` is the model registry over every family; `official` collects the official constructors
(`official_block`); `official_args` holds the checks those constructors share."""
