"""The transport-free request path: validate, route, call the champion, mirror, record."""
