"""Early-exit inference: confidence measures, threshold calibration and the compiled decoder.

Modules: `confidence` (exit confidence measures, patience, threshold validation), `calibrate`
(risk-controlling threshold choice: Learn-then-Test, conformal risk control), `early_exit`
(the compiled token-by-token early-exit decode).
"""
