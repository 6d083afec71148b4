"""The SQL the connector runs, in one place: plain SQL-92 with ``?`` parameters, so the same text runs on
SQL Server (pyodbc) in production and on SQLite in the tests.

Tables and columns come from third-party readers of IDENT's schema (see docs/ident.md). Some are our
assumptions and easy to change here if a clinic's database differs: ``ScheduledReceptions.PlanStart`` (the
booked start), ``Receptions.ID`` being the ``ID_Receptions`` of the booking it completes,
``Patients.InsurancePolicy`` (the DMS policy on the card) and ``Branches.Address``.
"""

from __future__ import annotations

# Ids of what changed since the cursor (DateTimeChanged; DateTimeAdded as well for bookings).
CHANGED_PATIENTS = """
SELECT p.ID_Patients FROM Patients p LEFT JOIN Persons per ON per.ID = p.ID_Persons
WHERE p.DateTimeChanged >= ? OR per.DateTimeChanged >= ?
"""
CHANGED_BOOKINGS = """
SELECT sr.ID_Receptions, sr.ID_Patients FROM ScheduledReceptions sr
WHERE sr.DateTimeChanged >= ? OR sr.DateTimeAdded >= ?
"""
CHANGED_RECEPTIONS = """
SELECT r.ID, r.ID_Patients FROM Receptions r WHERE r.DateTimeChanged >= ?
"""

# Bookings whose start passed in a window without a visit or a cancellation: candidates for no-show.
DUE_BOOKINGS = """
SELECT sr.ID_Receptions, sr.ID_Patients, sr.PlanStart, sr.Length FROM ScheduledReceptions sr
LEFT JOIN Receptions r ON r.ID = sr.ID_Receptions
WHERE sr.PlanStart >= ? AND sr.PlanStart < ? AND sr.ID_ReceptionCancelReasons IS NULL AND r.ID IS NULL
"""

# Full rows by id (the {ids} placeholder becomes ?,?,... for one chunk).
PATIENTS_BY_ID = """
SELECT p.ID_Patients, p.PatientNumber, p.CardNumber, p.Comment, p.InsurancePolicy, p.Status, p.ID_Branches,
       p.DateTimeChanged AS PatientChanged,
       per.Surname, per.Name, per.Patronymic, per.Sex, per.Birthday, per.Phone, per.MobilePhone, per.Email,
       per.City, per.DateTimeChanged AS PersonChanged
FROM Patients p LEFT JOIN Persons per ON per.ID = p.ID_Persons
WHERE p.ID_Patients IN ({ids})
"""
# The doctors of a patient's past visits (case B's "doctors seen before"), oldest visit first.
DOCTORS_SEEN_BY_PATIENT = """
SELECT r.ID_Patients, s.Surname AS StaffSurname, s.Name AS StaffName, s.Patronymic AS StaffPatronymic,
       MIN(r.DateTimeChanged) AS FirstSeen
FROM Receptions r JOIN Staffs s ON s.ID = r.ID_Staffs
WHERE r.ID_Patients IN ({ids})
GROUP BY r.ID_Patients, s.ID, s.Surname, s.Name, s.Patronymic
"""
BOOKINGS_BY_ID = """
SELECT sr.ID_Receptions, sr.ID_Patients, sr.ID_Staffs, sr.PlanStart, sr.Length, sr.ID_ReceptionCancelReasons,
       sr.DateTimeAdded, sr.DateTimeChanged, s.Surname AS StaffSurname, s.Name AS StaffName,
       s.Patronymic AS StaffPatronymic, r.ID AS ReceptionId, r.DateTimeChanged AS ReceptionChanged,
       p.ID_Branches, p.InsurancePolicy, b.Name AS BranchName, b.Address AS BranchAddress,
       (SELECT SUM(t.Cost) FROM Treatments t WHERE t.ID_Receptions = r.ID) AS Price
FROM ScheduledReceptions sr
LEFT JOIN Staffs s ON s.ID = sr.ID_Staffs
LEFT JOIN Receptions r ON r.ID = sr.ID_Receptions
LEFT JOIN Patients p ON p.ID_Patients = sr.ID_Patients
LEFT JOIN Branches b ON b.ID = p.ID_Branches
WHERE sr.ID_Receptions IN ({ids})
"""
# A visit recorded without a booking (a walk-in): completed, starting when it was recorded.
WALK_INS_BY_ID = """
SELECT r.ID, r.ID_Patients, r.ID_Staffs, r.DateTimeChanged, s.Surname AS StaffSurname, s.Name AS StaffName,
       s.Patronymic AS StaffPatronymic, p.ID_Branches, p.InsurancePolicy, b.Name AS BranchName,
       b.Address AS BranchAddress, (SELECT SUM(t.Cost) FROM Treatments t WHERE t.ID_Receptions = r.ID) AS Price
FROM Receptions r
LEFT JOIN ScheduledReceptions sr ON sr.ID_Receptions = r.ID
LEFT JOIN Staffs s ON s.ID = r.ID_Staffs
LEFT JOIN Patients p ON p.ID_Patients = r.ID_Patients
LEFT JOIN Branches b ON b.ID = p.ID_Branches
WHERE r.ID IN ({ids}) AND sr.ID_Receptions IS NULL
"""

CHUNK = 500  # ids per IN (...): well under SQL Server's 2,100 parameters
