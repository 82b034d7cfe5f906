-- Pipeline reporting: an index for "open deals by stage and close date" and a view over it.
CREATE INDEX deal_stage_close_date_idx ON deal (stage, close_date);

CREATE VIEW open_deal AS
SELECT d.id, d.name, d.stage, d.amount, d.currency, d.probability, d.close_date,
       a.name AS account_name
FROM deal AS d
JOIN account AS a ON a.id = d.account_id
WHERE d.stage NOT IN ('won', 'lost')
  AND d.deleted_at IS NULL
  AND d.trashed_at IS NULL;
