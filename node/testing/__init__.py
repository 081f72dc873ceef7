"""Test and demo helpers: the local swarm launcher, adversary behaviours."""
