"""llmtrain: one LLMTrainingJob from raw text to a trained, evaluated, exported model."""

__version__ = "0.1.0"
