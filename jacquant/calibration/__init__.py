"""A calibrated start for QAT: GPTQ block by block on the model's own grid (:func:`jacquant.calibrate`)."""
