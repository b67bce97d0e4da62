"""One router per service, plus health."""
