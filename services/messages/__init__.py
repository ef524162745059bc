"""The messages service: chat.v1.MessagesService."""
