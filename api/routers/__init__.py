"""One thin router per feature: parse the request, call a service, shape the response."""
