"""The block description and its rules, the algebra every other part of the library reads.

- `nodes`: blocks and models as plain typed data (`Rep`, `Conv`, `BN`, ..., `Block`, `Model`);
  `nodes_io`: the same as JSON-able data.
- `fusion`: the fusion algebra as small numpy functions (float64); `fuse`: the fusion rule of a
  description (the (kernel, bias) of any `Rep`, a whole state to the deploy form).
- `schema`: the neutral state's keys, shapes and kinds of a description in a form.
- `oracle`: the float64 reference forward; `counting`: parameters and MACs.
- `l2`: RepVGGplus' custom L2 from a block's description; `graphfuse`: branches found in a
  foreign graph (torch FX, ONNX) as a `Rep` and its fused conv.
"""
