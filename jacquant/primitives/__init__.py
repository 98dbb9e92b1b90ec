"""Pure math on tensors: the quantizer grid, backward rules, closed-form estimators of B, GGUF formats as grids,
packing, and GPTQ of one weight matrix. Imports nothing of jacquant but itself."""
