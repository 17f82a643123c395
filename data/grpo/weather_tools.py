"""The tool of data/grpo/weather.jsonl for --stage grpo --tool_module (docs/grpo.md): a fixed table, so that a
reward can check the answer the model gives after calling it."""

WEATHER = {"Paris": "sunny, 21 C", "Beijing": "cloudy, 18 C", "London": "rain, 14 C", "Tokyo": "clear, 24 C",
           "Cairo": "hot, 35 C", "Oslo": "snow, -3 C"}  # fmt: skip


def get_weather(city: str) -> str:
    """Today's weather in a city."""
    if city not in WEATHER:
        raise KeyError(f"no weather for {city!r}; known: {', '.join(WEATHER)}")
    return WEATHER[city]
