"""The users service: chat.v1.UsersService."""
