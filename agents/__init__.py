"""One module per AI service (data, nlp, llm, vision), each a model runner plus its agent wiring."""
