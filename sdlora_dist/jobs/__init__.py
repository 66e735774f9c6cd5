"""Job control: frontdoor, launch and runlock run in `sdlora train`; worker, distributed, ranklog on every rank."""
