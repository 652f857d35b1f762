"""Torch layer of lowrank-fed (imported as ``lowrank_fed.llm``): PEFT bridge, models, data, training, runner."""
