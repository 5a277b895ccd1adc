"""Reinforcement-learning experts for Gymnasium MuJoCo tasks (Stable-Baselines3) and the Minari datasets they
write: `sb3` trains, saves, loads and evaluates an expert (`dopr-robot expert train|eval`); `minari_collect`
rolls one out, with optional operator noise, into a Minari dataset (`dopr-robot collect --env`).

Stable-Baselines3 and Minari's jax are optional (the `create` extra), imported only inside these modules'
functions so that the rest of the tool never needs them.
"""
