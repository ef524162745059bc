"""`python -m services.messages`: serve chat.v1.MessagesService until SIGTERM/SIGINT."""

from services.common.server import run_service
from services.messages.service import DEFINITION

raise SystemExit(run_service(DEFINITION))
