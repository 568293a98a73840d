"""One router per resource: health, info, segment."""
