"""The threads service: chat.v1.ThreadsService."""
