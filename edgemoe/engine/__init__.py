"""The one engine: Session (what a command runs with), Request, EngineCore (the step), speculation."""
