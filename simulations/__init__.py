"""SimPy discrete-event models of WAN pipeline training and of the incentive economics.

Modules: `params` (typed configs), `pipeline` (the SimPy WAN model), `calibrate` (per-stage step
times measured on the real `sharding` stage code), `presets` and `wan` (scenarios, `run_wan`),
`validation` (simulation vs a measured local pipeline), `swarm_model` (a real local libp2p swarm
simulated from measured inputs: `runtime_cal` micro-measurements, `swarm_run` real runs, `node_trace`
and `trace_summary` for where a real step's time goes), `economics` and `incentives` (attacker
classes through the real accounting function, `run_incentives`), `plots` (matplotlib, Agg).
"""
