-- On the registry's own server a cold provision claims its spare role in the activation's
-- transaction (with configure), no longer in the reservation: the reservation then dirties only
-- `tenants` and `operations` before the clone, whose FILE_COPY checkpoints write and fsync every
-- relation left dirty (the claim's `spare_roles` and `pg_authid` and their indexes were 8 of 25
-- files). Until the activation the role is still a spare of the provision's process: a crash
-- leaves it to the next start-up (drop of a dead keyholder's spare roles) or to `monk doctor`
-- (dead_spare_role). The claim of 0026, raising (SQLSTATE MK001) instead of answering false when
-- the role is no longer that process's spare (drained meanwhile): the activation's transaction
-- then rolls back whole, and the provision makes a new role and activates again.
CREATE FUNCTION claim_spare_role_or_raise(p_spare text, p_role text, p_keyholder uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    IF NOT claim_spare_role(p_spare, p_role, p_keyholder) THEN
        RAISE EXCEPTION 'spare role % is no longer a spare of this process', p_spare
            USING ERRCODE = 'MK001';
    END IF;
END
$$;
