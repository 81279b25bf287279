"""Samplers as pure functions over timesteps and sigmas (UniPC, flow Euler, fixed steps),
and the named recipes (presets) that choose them."""
