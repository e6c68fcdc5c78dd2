"""Consumer accounts: quotas, prepaid credit (a ledger of grants and burns) and the rules that
put a consumer on the blocklist and take it off again."""
