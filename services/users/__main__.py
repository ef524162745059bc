"""`python -m services.users`: serve chat.v1.UsersService until SIGTERM/SIGINT."""

from services.common.server import run_service
from services.users.service import DEFINITION

raise SystemExit(run_service(DEFINITION))
