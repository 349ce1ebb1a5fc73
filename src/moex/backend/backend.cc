// Anchors the Backend vtable in moex_backend.
#include "moex/backend/backend.h"
