"""SimPy discrete-event models of WAN pipeline training and of the incentive economics.

Modules: `params` (typed configs), `pipeline` (the SimPy WAN model), `calibrate` (per-stage step
times measured on the real `sharding` stage code), `presets` and `wan` (scenarios, `run_wan`),
`validation` (simulation vs a measured local pipeline), `economics` and `incentives` (attacker
classes through the real accounting function, `run_incentives`), `plots` (matplotlib, Agg).
"""
