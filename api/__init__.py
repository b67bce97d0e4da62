"""The FastAPI edge: validates HTTP requests, answers cache hits, produces request events and awaits
their replies on its own reply topic."""
