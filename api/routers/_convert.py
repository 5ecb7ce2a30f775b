"""Domain objects to response schemas."""

from api.schemas.common import ErrorBody, FaceBox
from api.schemas.users import RegisterResult, RejectedFile, User
from api.services.detection import DetectedFace
from api.services.recognition import RegisterOutcome
from api.store import UserRecord


def box_of(face: DetectedFace) -> list[int]:
    return [round(v) for v in face.box]


def face_box(face: DetectedFace) -> FaceBox:
    return FaceBox(box=box_of(face), score=round(face.score, 4))


def user_of(record: UserRecord) -> User:
    return User(
        id=record.id,
        name=record.name,
        faces=record.faces,
        collection=record.collection,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def register_result(outcome: RegisterOutcome) -> RegisterResult:
    return RegisterResult(
        user=user_of(outcome.user),
        rejected=[
            RejectedFile(file=name, error=ErrorBody(code=exc.code, message=exc.message, details=exc.details or None))
            for name, exc in outcome.rejected
        ],
    )
